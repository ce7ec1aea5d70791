"""Where FPDT's chunks and checkpointed inputs live: device, host (pinned) or a disk file."""
