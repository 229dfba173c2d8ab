"""What a finished run or sweep leaves for people: artifacts, plots, ``report.html``, the sweep table."""
