"""`sera select`: the top pairs by IRM, or max-IRM pairs built from scored candidates."""
