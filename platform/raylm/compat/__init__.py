"""Every use of a dependency's private API, each with a contract test naming the version it was written for."""
