"""The ChatLMSYS pipeline: an LMSYS-Chat-style trace through placement and the four systems."""
