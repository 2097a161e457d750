"""The `wsmerge` command line: thin click commands over the libraries."""
