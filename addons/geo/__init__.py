"""Where a client is (GeoIP2), which pool serves it, and keeping the database current."""
