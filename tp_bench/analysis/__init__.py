"""Analysis of results files and suite JSON: compare, plots, the regression gate. Reads files;
imports the core only."""
