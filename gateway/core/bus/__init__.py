"""The bus: the supervised connection, the embedded server, the contract headers and the bus services."""
