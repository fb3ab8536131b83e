"""presend: keep an ESP's merge fields fresh before every campaign send."""
