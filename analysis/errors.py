"""The one exception the analysis layer raises for bad or incomplete results."""


class ResultsError(ValueError):
    """Results on disk are missing, empty or do not follow the sweep data contract.

    The message is always a single line so the CLI can print it without a traceback.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
