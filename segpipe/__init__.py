"""The segpipe library the stages call: data, models, training, inference and the competition's formats;
`stack` and `cli` start and drive the local services."""
