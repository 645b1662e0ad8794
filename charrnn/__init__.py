"""charrnn: character-level recurrent language models, from a text file to a streaming gRPC service."""

__version__ = "0.1.0"
