class DataError(ValueError):
    """Bad input data; the message names the file or folder and what is wrong."""
