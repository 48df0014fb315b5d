"""The CDK app that deploys batch-api to AWS: one stack per environment, one construct per concern."""
