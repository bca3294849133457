"""Judging samples. `digits`: a digit classifier fitted on the embedded MNIST digits, for the
demos (do the samples show the digits that were asked for?)."""
