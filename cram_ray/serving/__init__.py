"""Answering with a stream's model: the run's end-of-task state restored, predict and Ray Serve."""
