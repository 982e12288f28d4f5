"""`clipcrawl serve`: the kNN query service (serving.service), its HTTP front (serving.http) and
the search page (serving/static/index.html)."""
