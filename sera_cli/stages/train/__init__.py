"""`sera train`: the pairs read, checked and tokenized, the reference planned, and the trainer (`trainers/`) run."""
