"""The one exception the image builder raises."""


class ImageBuildError(RuntimeError):
    """The demo image cannot be built; the message says why and, where it can, what to do."""
