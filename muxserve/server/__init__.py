"""The OpenAI-compatible HTTP frontend of one MuxServe instance (see ``muxserve.serve``)."""
