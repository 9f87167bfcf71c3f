"""Errors whose message is meant for the person using the tab or the command line."""


class TrainToolsError(Exception):
    """A problem the user can fix; the message says what and where."""


class ConfigError(TrainToolsError):
    """A training setting is out of range or inconsistent."""


class DatasetError(TrainToolsError):
    """The training folder, an image or a caption cannot be used."""


class CheckpointError(TrainToolsError):
    """A model file cannot be loaded."""


class OutputError(TrainToolsError):
    """An output file cannot be written (name refused, file exists, ...)."""


class TrainingDiverged(TrainToolsError):
    """The loss became NaN or infinite."""
