"""Log-probs of many sequences with one model: batching, the content-addressed cache, chunked resumable computation."""
