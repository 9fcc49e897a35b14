"""What a run leaves to read: tables and files (:mod:`.tables`), plots, the comparison of
finished runs (``mke report``) and the localisation summary."""
