"""Errors a user can act on. The CLI prints these as one line instead of a traceback."""


class JaxdiffError(Exception):
    """Base of jaxdiff's own errors: each message names the problem and, where there is one, the fix."""


# What the CLI reports as a one-line message. ValueError covers bad arguments raised by the
# modules (an image size the U-Net cannot halve, an unknown sampler option, ...).
USER_ERRORS = (JaxdiffError, ValueError, FileNotFoundError)
