"""The playground page: try text streaming and images in a browser."""
