"""Cluster layer: the placement's meshes as instances on Ray nodes, behind one OpenAI endpoint."""
