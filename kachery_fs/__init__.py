"""kachery-fs: mount kachery channels as a drive."""

__version__ = "0.1.0"
