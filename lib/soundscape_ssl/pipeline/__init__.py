"""The pipeline: the `soundscape-ssl` command and the papermill driver of the numbered notebooks."""
