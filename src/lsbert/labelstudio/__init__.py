"""Label Studio's side of the data: tasks and annotations as labelled examples (``examples``, pure), and
the labelled tasks of a project read through label-studio-sdk (``source``). Shared by the trainer (its data
set) and the predictor (the embedding head rebuilt from a project's annotations)."""
