"""What a person sees of a job, and how every job ends.

runner    run_job: the one way a command ends (the `error:` line, the trace's log file,
          a signal's line, the summary, the JSON line last) and the exit code
console   phases, warnings, the one progress bar, worker events, the log file
faults    a fault's one line and its trace file; SIGINT / SIGTERM as one way to stop
training  the training job's opening lines, closing table and what a failure means
"""
