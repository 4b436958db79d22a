"""Names of this package's adapter format (shared by every method's ``save``)."""

ADAPTER_FORMAT = "increlora-adapter"
ADAPTER_FORMAT_VERSION = 1
CONFIG_FILE = "increlora_config.json"
WEIGHTS_FILE = "adapter.safetensors"
