"""The lazy store: a cache file, its extent map and the fetch and copy machinery over a source."""
