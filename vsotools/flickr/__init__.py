"""Flickr: the API client the crawler uses (``client``) and a local Flickr-compatible server
(``server``) for tests, demos and offline dry runs."""
