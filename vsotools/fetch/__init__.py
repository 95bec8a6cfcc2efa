"""Step 1: photos and their images into a dataset folder (Flickr crawl or a pairs file)."""
