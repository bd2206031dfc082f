"""`sera inspect`: what the margins of a scored file say."""
