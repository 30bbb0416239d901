"""The registered evaluation suites, one module each."""
