"""`sera report`: tables and figures of one or more `sera run` workdirs."""
