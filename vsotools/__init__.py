"""vsotools: visual-textual sentiment datasets from Flickr and the deep fusion CNN trained on them."""

__version__ = "0.1.0"
