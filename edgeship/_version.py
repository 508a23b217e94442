__version__ = "0.1.0"
#: Version of the JSON files edgeship writes (reports, cards, summaries); every one carries it as ``schema_version``.
SCHEMA_VERSION = 1
