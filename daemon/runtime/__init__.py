"""The daemon process: the loop, the job book, placement, publishing, recovery, status. No torch."""
