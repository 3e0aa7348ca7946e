-- neurondb_vectors.embedding gets no planner statistics (the column's statistics target 0).
--
-- ANALYZE computes, for an array column, the most common elements and a histogram of distinct element
-- counts: for embeddings, one float per dimension of each of the 30,000 sampled rows. No query filters on
-- an embedding's elements, so the planner never reads them, and they were nearly all of ANALYZE's work on
-- this table: 20,000 rows of 128 dimensions took 1.7 s to analyze, 80 ms without them (more dimensions cost
-- more). That work ran in every ANALYZE and VACUUM (ANALYZE), neurandefrag's after a bulk COPY and
-- autovacuum's, on a core that searches could have had. The other columns keep their statistics.
ALTER TABLE neurondb.neurondb_vectors ALTER COLUMN embedding SET STATISTICS 0;
