class SafetyError(RuntimeError):
    """Root of this package's errors: a term list or a checker that cannot be loaded."""
