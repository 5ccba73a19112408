"""Media, a leaf: video files in and out (`video_io`), the one atomic writer (`fileio`) and the one settings schema
a video records (`metadata`, which also holds the package's version).

May import: `errors` and `devices` only."""
