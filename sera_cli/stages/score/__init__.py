"""`sera score`: implicit rewards and their margin (IRM) per pair or candidate, the ensemble with a previous IRM, and the precision check."""
