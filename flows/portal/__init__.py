"""The offline report portal: vendored browser assets, localized Data Docs, reports/index.html."""
