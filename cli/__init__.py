"""cli: click commands only: parse, call a library, print. No crypto here."""
