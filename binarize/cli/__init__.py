"""Command-line interface: ``binarize <subcommand>``, thin wrappers over the library."""
