"""Using a model: loading a run or a folder, generating answers, chatting."""
