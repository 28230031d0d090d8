"""Errors raised by vae_core. Every message names the problem and, where there is one, the fix."""


class VAEError(ValueError):
    """Bad input to vae_core: a wrong file, a wrong tensor, a wrong option."""


class VAEInterrupted(RuntimeError):
    """Raised between tiles when the caller's ``should_stop`` callback returned True."""
