"""An incident's timeline from the event journal: the model (:mod:`.model`), the window of time
asked for (:mod:`.when`), and its two renderings, text (:mod:`.text`) and a self-contained HTML
page (:mod:`.html`). ``fsnotifyd events log`` (``app/eventslog.py``) puts them together."""
