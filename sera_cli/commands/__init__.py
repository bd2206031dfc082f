"""One module per `sera` command; each only parses options and calls the library."""
