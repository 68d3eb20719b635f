"""The one error type of gemma4.media: bad or unsupported media, said in words a user can act on."""


class MediaError(ValueError):
    """An image or video that cannot be used: unreadable, empty, too large, or of an unsupported type."""
