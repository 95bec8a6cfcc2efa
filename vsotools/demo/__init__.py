"""The offline demo: a synthetic corpus and a local Flickr-compatible server for it."""
