"""`sera generate`: N distinct sampled responses per prompt, written as a candidates table (engines in `backends/engines`)."""
